"""The kopf operator that reconciles InferenceService resources (never imports the engine)."""
