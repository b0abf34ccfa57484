"""What people run: the `lookalike` command line, the load tester, sizing, ingest, contact sheets, code generation."""
