"""Img2LLM: the prompt in the authors' format, answer candidates ranked by count, contexts picked
from the least frequent candidate up, the rule questions, the question generator's input, the
answer cut."""

from modalign.pipelines.img2llm import (
    TEMPLATES,
    Img2LLM,
    LLMQuestions,
    Tagger,
    TemplateQuestions,
    answer_candidates,
    build_prompt,
    clean_answer,
    pick_contexts,
    qg_input,
    rule_tags,
)


def test_prompt_is_the_authors():
    got = build_prompt(["a dog on a sofa", "The dog is brown."], [("What item is this in this picture?", "Dog"),
                       ("What is it?", "a very long answer of words")], "what colour is the dog?",
                       yes_question="Is there a dog?")  # fmt: skip
    # Imape2Prompt_evaluation.py: the instruction line, 'Contexts:' and each caption capitalised with
    # its full stop, no separator; the yes exemplar and the fixed toilet exemplar; then
    # 'Question:%s\nAnswer:%s\n' per exemplar (answers of 5+ words left out, lower-cased); the question
    want = ("Please reason the answer of the questions according to the given contexts.\n"
            "Contexts:A dog on a sofa.The dog is brown.\n"
            "Question:Is there a dog?\nAnswer:yes\n"
            "Question:Is this a toilet?\nAnswer:no\n"
            "Question:What item is this in this picture?\nAnswer:dog\n"
            "Question:what colour is the dog?\nAnswer:")  # fmt: skip
    assert got == want
    # rule questions make no question for "yes": neither the yes nor the no exemplar is written
    assert "toilet" not in build_prompt(["a dog"], [("What item is this in this picture?", "dog")], "q?")


def test_question_generator_input_is_the_papers():
    # "answer: %s  context: %s." (two spaces), the answer with its full stop, the captions concatenated
    assert qg_input("dog.", ["a dog.", "a sofa."]) == "answer: dog.  context: a dog.a sofa.."


def test_rule_tags_and_candidates_ranked_by_count():
    assert rule_tags("Two small red circles slowly rolling at the top.") == [
        ("Two", "NUM"), ("small", "ADJ"), ("red", "ADJ"), ("circles", "NOUN"), ("slowly", "ADV"),
        ("rolling", "VERB"), ("at", "ADP"), ("the", "DET"), ("top", "NOUN")]  # fmt: skip
    caps = ["a red circle at the top", "a blue circle", "a red star"]
    answers, where, pos = answer_candidates(caps, Tagger(use_spacy=False), n_answers=4)
    # counts: red 2, circle 2, top 1, blue 1, star 1, "red circle" 1 ...; ties keep first occurrence
    assert answers == ["red.", "circle.", "top.", "red circle.", "yes."]
    assert where["red"] == [0, 2] and where["circle"] == [0, 1] and where["blue"] == [1]
    assert pos["red."] == "ADJ" and pos["circle."] == "NOUN" and pos["red circle."] == "NOUN"


def test_contexts_walk_from_the_least_frequent_candidate():
    answers = ["red.", "circle.", "star.", "yes."]
    where = {"red": [0, 2], "circle": [0, 1], "star": [2]}
    # yes. (in no caption: caption 0), star. -> 2, circle. -> 0 taken, so 1; red. -> 0, 2 taken: nothing
    assert pick_contexts(answers, where, 3) == [0, 2, 1]
    assert pick_contexts(answers, where, 2) == [0, 2]
    assert pick_contexts(answers, where, 10) == [0, 2, 1]  # no caption left to add: the walk stops


def test_rule_questions_by_part_of_speech():
    tq = TemplateQuestions(seed=0)
    assert tq("dog.", "NOUN", []) in TEMPLATES["NOUN"]
    assert tq("red.", "ADJ", []) in TEMPLATES["ADJ"]
    assert tq("2.", "NUM", []) is None  # the authors have no number templates


class Recorder:
    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def complete(self, prompt, max_tokens=5):
        self.prompts.append((prompt, max_tokens))
        return self.reply, None


def test_answer_end_to_end_with_a_scripted_llm():
    llm = Recorder(" Red. It is red\nmore")
    i2l = Img2LLM(llm, n_answers=3, n_captions=2, tagger=Tagger(use_spacy=False))
    out = i2l.answer("What colour is the circle?", ["a red circle", "a red star at the top"])
    assert out.answer == "red"
    prompt = llm.prompts[0][0]
    assert prompt == out.prompt and prompt.endswith("Question:What colour is the circle?\nAnswer:")
    # candidates red. circle. "red circle." yes.; two tries: yes. (no caption: caption 0), then
    # "red circle." (only in caption 0, taken): one context
    assert out.contexts == ["a red circle"]
    assert all(q in sum(TEMPLATES.values(), []) for q, _ in out.exemplars)
    assert clean_answer("Blue\nsky") == "blue"


def test_llm_question_generator_reads_the_t5_input():
    qg = LLMQuestions(Recorder("what animal is it?\n"))
    assert qg("dog.", "NOUN", ["a dog"]) == "what animal is it?"
    assert qg.completer.prompts[0][0] == "answer: dog.  context: a dog.\nquestion:"
