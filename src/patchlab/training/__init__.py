"""One job: build backbone, model and trainer from the config, fit, test, evaluate and save."""
