"""The raw fixed-stride ``.bin`` format (docs/formats.md): imported exactly, exported back."""
