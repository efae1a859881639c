"""Ray Serve forecasting service: thin over cohortcast.models / cohortcast.inference."""
