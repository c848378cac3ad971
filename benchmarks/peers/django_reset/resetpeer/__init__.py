"""Django project of the password-reset peer: settings, URLs and the Argon2id hasher."""
