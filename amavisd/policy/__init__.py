"""Policy: what a verdict means for the mail (destinies) and which parts are
banned by name or type (banned)."""
