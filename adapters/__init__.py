"""Platform adapters: they translate platform messages to core requests and back."""
