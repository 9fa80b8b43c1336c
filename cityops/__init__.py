"""cityops: live city street-furniture management."""
