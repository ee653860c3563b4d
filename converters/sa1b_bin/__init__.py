"""The raw fixed-stride ``.bin`` format of SEEDS.md 000: imported exactly, exported back."""
