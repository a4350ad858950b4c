"""Node side of the distance guard: reference building, generate and screen runs."""
