"""The package layout's contracts (docs/ARCHITECTURE.md): the core never imports the miniature,
the model code imports no training or distributed code, and every module imports on its own
(no import cycle that depends on what was imported first)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "modalign"
CORE = ("models", "checkpoints", "data", "train", "eval", "infer", "serve", "pipelines", "config.py", "presets.py",
        "llm_client.py")  # fmt: skip


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def files(*parts: str) -> list[Path]:
    return sorted(
        p for part in parts for p in ([PKG / part] if part.endswith(".py") else (PKG / part).rglob("*.py"))
    )


def test_the_core_never_imports_the_miniature():
    bad = {str(p.relative_to(PKG)): sorted(m for m in imports(p) if m.startswith("modalign.shapesworld"))
           for p in files(*CORE)}  # fmt: skip
    assert not {k: v for k, v in bad.items() if v}


def test_model_code_imports_no_training_data_or_distributed_code():
    banned = ("modalign.train", "modalign.data", "modalign.infer", "modalign.serve", "torch.distributed",
              "torch.optim")  # fmt: skip
    bad = {
        str(p.relative_to(PKG)): sorted(m for m in imports(p) if m.startswith(banned))
        for p in files("models")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_every_module_imports_on_its_own():
    names = sorted(
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PKG.rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'modalign' or m.startswith('modalign.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
