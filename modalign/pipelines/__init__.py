"""Systems that train nothing end to end: a frozen LLM reasoning over text that vision models
produce (PICa in ``pica.py``)."""
