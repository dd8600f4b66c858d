"""The backend/frontend combinations every rendering test covers."""

COMBINATIONS = [
    ("localai", "chatbot-ui"),
    ("textgen", "textgen"),
    ("llamacpp", "chatbot-ui"),
    ("localai", "textgen"),
    ("textgen", "chatbot-ui"),
]
