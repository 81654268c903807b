"""Agents: who answers a call. Role prompts rendered from sandboxed Jinja templates with the caller's CRM
record, within the model's token budget."""
