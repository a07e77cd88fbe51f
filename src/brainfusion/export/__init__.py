"""Export: runs as diffusers folders that plain diffusers loads, with a model card."""
