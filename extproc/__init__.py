"""tokenpools: admission control and autoscaling for multi-tenant LLM inference."""
