"""PyTorch models: pure nn.Modules (no optimiser, loss or device inside). ``models.registry`` lists them."""
