"""Server-rendered pages: sign-in and the landing page (the full UI comes later)."""
