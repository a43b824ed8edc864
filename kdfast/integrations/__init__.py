"""Integrations with other training libraries (each needs its extra: ``pip install 'kdfast[hf]'``)."""
