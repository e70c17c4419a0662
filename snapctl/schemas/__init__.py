"""The JSON schema of snapctl's --json output (cli.json; documented in docs/cli.md)."""
