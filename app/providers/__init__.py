"""Provider types register themselves on import; importing this package loads them all."""
from app.providers import anthropic, gemini, gigachat, ollama, openai_compatible, pollinations, simulator  # noqa: F401
