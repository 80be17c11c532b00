"""Building blocks of ``tools/train_demo.py``: corpus, tokenizer, LM and scorer training, checks."""
