"""Problem sets (``datasets``) and chat-template prompts (``prompts``)."""
