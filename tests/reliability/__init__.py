"""The reliability suite (issue 6): `make reliability` runs every scenario at full size through
`python -m tests.reliability`; `make test` runs the fast sizes."""
