"""Prediction jobs for their whole life: creation, claim, result, cancel, republish; batches, studies, deliveries."""
