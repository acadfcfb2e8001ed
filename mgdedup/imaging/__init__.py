"""Images in and out: reading files robustly, test-time transforms, augmentations, edited
copies, generated scenes and the folder scan."""
