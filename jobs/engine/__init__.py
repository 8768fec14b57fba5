"""The model process the web side talks to: one long-lived child that holds models for estimate, export and generate."""
