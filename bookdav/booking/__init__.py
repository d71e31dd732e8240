"""The booking domain: availability, slot search, the atomic booking transaction."""
