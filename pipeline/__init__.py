"""The project's pipeline: params validation, DVC stage commands, MLflow tracking, reports."""
