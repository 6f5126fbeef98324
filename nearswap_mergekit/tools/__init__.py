"""The tools around a merge: check (preflight.py), compare and hash
(checkpoints.py, compare.py), pinned recipes (pin.py), the shipped recipes
(recipebook.py) and recipes rewritten with new t (recipewriter.py)."""
