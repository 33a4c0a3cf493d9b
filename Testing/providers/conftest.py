"""The fake native upstreams (real HTTP servers) for the adapter tests of this directory."""
from Testing.fakes.native import (fake_anthropic, fake_gemini, fake_gigachat, fake_ollama,  # noqa: F401
                                  fake_pollinations)
