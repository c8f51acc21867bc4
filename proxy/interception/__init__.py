"""interception"""
