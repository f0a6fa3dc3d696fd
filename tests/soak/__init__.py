"""`make soak`: thousands of messages through the SMTP filter while workers recycle and die."""
