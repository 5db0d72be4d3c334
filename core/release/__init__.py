"""Release: model card, registry (register/promote), shipping to the production host, notifications."""
