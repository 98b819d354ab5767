"""The build side: templates -> bootstrapped, scripted, cleaned roots -> packed caches; status and updates."""
