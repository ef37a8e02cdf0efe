"""Training utilities: a generic, seeded minibatch loop with early stopping."""
