"""CRM adapters: look up what the agent should know about a caller."""
