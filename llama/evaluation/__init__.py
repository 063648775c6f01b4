"""Evaluation: lm-evaluation-harness's model API on this package (``harness``) and the scoring of
token sequences it and the commands use (``scoring``)."""
