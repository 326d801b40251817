"""syncpoint's benchmark suite: `scripts/bench`, or `python -m bench --help`.

Six cases, each measured side by side with a baseline in the same invocation, printed as
a table and written to BENCHMARKS.md. Not part of the test suite's pass/fail.
"""
