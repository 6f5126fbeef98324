"""The method: what mergekit calls. spec.py defines t and the card's facts, kernel.py
the chain (pure torch; _fused.py/_fused.c its compiled CPU path), adapter_015.py and
adapter_014.py present it to mergekit's two merge-method APIs, registration.py
registers it. Knows nothing of the layers above."""
