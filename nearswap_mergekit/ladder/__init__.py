"""The ladder: a recipe's merges at several t scored on the user's text, written
nowhere. setup.py makes a run ready from a plan, engine.py runs it (rungs.py: the
rows; weights.py: weights merged on access; output.py: the merged model's config
and tokenizer), scoring.py is the scoring rule. Importing this package imports
no torch."""

#: dtypes `ladder --eval-dtype` runs the model in.
EVAL_DTYPES = ("float32", "bfloat16", "float16")
