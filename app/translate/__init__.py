"""Pure translators between the inbound dialects and the canonical request (OpenAI chat
completions), one module per direction, named for what it translates."""
