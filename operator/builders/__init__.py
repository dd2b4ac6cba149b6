"""Pure builders: a parsed InferenceServiceSpec in, Kubernetes manifests (dicts) out. No I/O."""
