"""Test helpers for stackd and for users' own tests of their stacks (pytest plugin, leak check)."""
