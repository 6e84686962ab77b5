"""Mutation testing (`make mutate`): small deliberate bugs put into the code one at a time, with mutmut; a test
must fail for each. `python -m tests.mutation` runs it and writes docs/mutation.md."""
