"""Ray itself: start-up or connection, what every worker's environment carries, requests to the autoscaler."""
