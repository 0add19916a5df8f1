"""What a study leaves: the JSON recommendation, the report's pictures, the dashboard, and a
grid study as a landscape file. Reads the storage; measures nothing."""
