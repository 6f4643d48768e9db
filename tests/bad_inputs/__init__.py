"""The bad-input corpus: hostile and damaged files run through the public entry points.

`harness.py` runs one case in a child process and checks what a user would see; the cases live in
`cases_<area>.py` modules (each a `CASES` list); `tests/test_bad_inputs.py` runs them all, and
`python -m tests.bad_inputs.make_corpus OUT` writes every case's inputs to disk (and, with
`--run`, runs them and prints the outcome table of docs/SECURITY.md).
"""
