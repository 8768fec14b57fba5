"""What the user touches: the command line and the browser UI. No training code lives here."""
