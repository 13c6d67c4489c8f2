"""Data: the synthetic cross-modality generator and the MedMNIST .npz loader."""
