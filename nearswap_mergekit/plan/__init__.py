"""Planning and reading: a recipe (recipe.Plan) -> tensor jobs through mergekit's
planner (planning.py) -> rows read (reader.py, sampling.py, measuring.py) ->
statistics (stats.py) and calibrated t (calibration.py)."""
