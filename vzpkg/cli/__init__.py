"""Command-line front ends (click): parse, call the library, print. No logic here."""
