"""imagebot: make and edit pictures from chat, paid per image with x402."""
